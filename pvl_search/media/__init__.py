"""Reading media: video and image decoding, the decode worker pool, thumbnails."""
