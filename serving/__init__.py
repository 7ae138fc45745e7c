"""serving stage of the detection lifecycle."""
