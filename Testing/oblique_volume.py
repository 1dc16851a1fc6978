"""A small test volume whose voxel axes are flipped and permuted against RAS, with anisotropic spacing
and an origin: the geometry the MRML tests put through Slicer's classes."""

import numpy as np
import vtk

SHAPE_KJI = (5, 6, 7)
#: Columns (0,0,-2.5), (-0.7,0,0), (0,1.2,0): I runs inferior, J runs right-to-left, K runs anterior.
IJK_TO_RAS = np.array(
    [
        [0.0, -0.7, 0.0, 12.3],
        [0.0, 0.0, 1.2, -40.0],
        [-2.5, 0.0, 0.0, 7.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def rigid_transform(hs, angle: float, shift: tuple[float, float, float]):
    """A linear transform node: a rotation by `angle` degrees about (1, 2, 3), then a shift."""
    transform = vtk.vtkTransform()
    transform.Translate(*shift)
    transform.RotateWXYZ(angle, 1, 2, 3)
    node = hs.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node
