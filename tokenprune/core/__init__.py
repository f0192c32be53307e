"""The shared mechanics that drive a model through a reduction: masks, merging, selection checks."""
