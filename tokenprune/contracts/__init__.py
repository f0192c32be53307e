"""What strategies and adapters implement: `Reducer`, `TokenView`, `Merge`, `Adapter`, `VisualLayout`."""
