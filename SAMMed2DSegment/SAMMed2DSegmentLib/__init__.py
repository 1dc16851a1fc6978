"""SAM-Med2D segmentation engine for 3D Slicer, importable without the Slicer application.

Layers (see the project's design notes): a pure layer (numpy + torch: network, predictor, geometry,
propagation, weights, DICOM-SEG), an MRML bridge (Slicer's MRML classes only) and a command line.
"""

__version__ = "0.1.0"
