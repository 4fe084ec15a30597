"""Review of data and runs: inspect a recipe's data, Grad-CAM explanations, the experiment sheet, cross-validation."""
