"""Medical image classification pipeline."""
