"""Built-in strategies, one file each; registered through the `tokenprune.strategies` entry points."""
