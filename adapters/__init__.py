"""Built-in model adapters, one file each; registered through the `tokenprune.adapters` entry points."""
