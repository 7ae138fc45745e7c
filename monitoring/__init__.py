"""monitoring stage of the detection lifecycle."""
