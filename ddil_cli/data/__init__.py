"""Real data: the image-caption webdataset reader and the embedded digits shards."""
