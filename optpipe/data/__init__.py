"""Texts optpipe ships (calibration, validation, unlabeled) and user calibration files."""
