"""Calibration and evaluation data: readers that yield ``{input_name: ndarray}`` samples."""
