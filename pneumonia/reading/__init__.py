"""Reading: image bytes or files (JPEG, PNG, BMP, TIFF, DICOM) to upright greyscale pixels, and the
pixel statistics the gate checks. Imports nothing else of the package but its errors."""
