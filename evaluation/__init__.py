"""evaluation stage of the detection lifecycle."""
