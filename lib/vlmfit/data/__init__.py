"""The data stage: the canonical record, readers for peers' formats, validation, media
(images and videos), and the bundled synthetic dataset."""
