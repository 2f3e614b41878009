"""The data layer: manifests, decoding (PNG/JPEG/TIFF/DICOM → float image), synthetic cohorts, the loader.

Everything downstream sees an image only as a float32 (H, W) array in [0, 1]; this package is where file
formats, bit depths and DICOM pixel semantics are absorbed so that no backbone or cache code has to know about
them.
"""
