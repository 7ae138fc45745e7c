"""labeling stage of the detection lifecycle."""
