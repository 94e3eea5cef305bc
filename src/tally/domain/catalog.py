"""The default price catalog, from the published Creative Units figures:
5,000 units buy 1,000 SDXL images, 500 upscales or 1,000 vectorizations."""

DEFAULT_CATALOG: dict[str, int] = {
    "image.generate.sdxl": 5,
    "image.upscale": 10,
    "image.vectorize": 5,
}
