"""training stage of the detection lifecycle."""
