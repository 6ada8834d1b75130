"""The domain rules: what makes an image acceptable (``images``), what the recognised fields
must satisfy (``checks``), which two images are the sides of one card (``pairing``), and what
of a record may be shown outside the export (``masking``)."""
