"""CrackSense shared library: every script is a thin front door onto these modules."""
