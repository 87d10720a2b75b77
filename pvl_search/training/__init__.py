"""Training: objectives, the loop, recipes, data sets of (video, caption) pairs, CLIP initialisation."""
