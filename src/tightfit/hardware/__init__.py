"""Hardware: detection, device profiles and the doctor checks."""
