"""Dataset readers for peers' formats, validation, and the bundled synthetic dataset."""
