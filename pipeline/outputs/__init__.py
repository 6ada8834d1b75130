"""Outputs: the result records as JSONL/CSV (``records``) and as one JSON per image plus a
manifest in a folder or an S3 prefix (``files``)."""
