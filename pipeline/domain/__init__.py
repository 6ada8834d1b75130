"""The domain rules: what makes an image acceptable (``images``), what the recognised fields
must satisfy (``validation``), which two images are the sides of one card (``pairing``)."""
