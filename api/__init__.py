"""The HTTP edge: the async view decorator and the one JSON error shape."""
