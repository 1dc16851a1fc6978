"""Real Slicer slice views without the Slicer application, for tests, screenshots and the demo:
Red/Green/Yellow views rendered offscreen, driven by real VTK mouse and key events.

Each view is what `qMRMLSliceView` builds, minus Qt: a `vtkMRMLSliceLogic` with its slice node
(`vtkMRMLSliceNodeRed`, ...) registered in the application logic's slice logics, an offscreen
`vtkRenderWindow` + `vtkRenderer` + interactor, a displayable manager group instantiated from
`vtkMRMLSliceViewDisplayableManagerFactory` (crosshair, segmentations 2-D, markups) and Slicer's
`vtkMRMLSliceViewInteractorStyle`, which turns interactor events into `vtkMRMLInteractionEventData` and hands
them to the displayable managers. The slice image itself is no displayable manager's job: the slice logic
blends the layers into an RGBA image (`GetImageDataConnection()`), which we show with a 2-D image actor in the
background, as Kitware's trame-slicer does in place of CTK's `vtkLightBoxRendererManager`.

What a synthetic click needs to place a control point
-----------------------------------------------------
The interactor must not keep VTK's default interactor style (`vtkInteractorStyleSwitch`, whose current
style is a joystick or trackball camera). That style observes the same interactor; on the left button press
it *grabs the interactor's focus* (to rotate the camera), and while a focus holder exists
`vtkObject::InvokeEvent` delivers events to the focus holder only. So Slicer's style sees the press but never
the release: the markups widget stays in its Define state with only a preview point, the point is never
defined and the interaction mode stays Place -- the symptom "preview at the right place, no defined point".
Slicer's own slice view puts a passive `vtkInteractorStyleUser` on the interactor instead, and so does
trame-slicer. Nothing else was needed: no render before the events, no timing, no interaction node reference
on the view node; the world position comes from the slice node's XYToRAS, so the slice node only needs the
view's size (`ResizeSliceNode`) for display and world positions to agree.

Sources relied on (Slicer at commit 583e9b37d50ead7daf7b783dce465ccaecec8809, version 5.13.0 in its
CMakeLists.txt; the behaviour below was also checked against the `slicer-core` 5.13.31053 wheel):

* Libs/MRML/Widgets/qMRMLSliceView.cxx:113-115 -- the slice view's interactor gets a
  `vtkInteractorStyleUser`; :152, :208 the `vtkMRMLSliceViewInteractorStyle` gets the displayable manager
  group and the interactor. Libs/MRML/DisplayableManager/vtkMRMLSliceViewInteractorStyle.h:34 "Relies on
  vtkInteractorStyleUser".
* Libs/MRML/DisplayableManager/vtkMRMLViewInteractorStyle.cxx:520-577 -- `SetInteractor` observes the
  interactor's mouse and key events at priority 0, beside whatever VTK style the interactor has;
  :438-465 `CustomProcessEvents` resets `MouseMovedSinceButtonDown` on a press, sets it on a move, and offers
  every event to the displayable managers first, aborting it when one took it (:282-293);
  :331-426 the displayable manager that can process the event at the smallest distance gets it.
* Libs/MRML/DisplayableManager/vtkMRMLSliceViewInteractorStyle.cxx:95-115 -- the event's world position is
  the slice node's XYToRAS applied to the display position (minus the poked renderer's origin).
* Modules/Loadable/Markups/MRMLDM/vtkMRMLMarkupsDisplayableManager.cxx:643-686 -- in Place mode a mouse move
  is claimed at distance 0 when the active place node's class is manageable and the node is displayable in
  this view; :767-773 the placement widget is put in WidgetStateDefine; :845-931 that widget is the active
  place node's (a new node is made only when the active one is missing or full).
* Modules/Loadable/Markups/VTKWidgets/vtkSlicerMarkupsWidget.cxx:54-55 -- in Define state a left press is
  reserved (swallowed) and the left *release* is `WidgetEventControlPointPlace`; :546-567 in Define state the
  widget claims every event; :143-164 mouse moves only update the preview point; :1177-1223 `PlacePoint`
  defines the previewed point and, with PlaceModePersistence 0 (or once the required or fixed number of
  points is reached), switches the interaction node to ViewTransform.
* Libs/MRML/DisplayableManager/vtkMRMLAbstractDisplayableManager.cxx:734-742 with
  Libs/MRML/Core/vtkMRMLAbstractViewNode.cxx:309-317 -- each displayable manager takes its interaction node
  from the view node (its interaction node reference, else the scene's singleton) when the view node is set;
  Libs/MRML/DisplayableManager/vtkMRMLDisplayableManagerGroup.cxx:252-259 -- and its application logic from
  the (process-wide) factory when it is added to a group, hence `SetMRMLApplicationLogic` before `Initialize`.
* VTK: Interaction/Style/vtkInteractorStyleJoystickCamera.cxx and vtkInteractorStyleTrackballCamera.cxx,
  `OnLeftButtonDown` calls `GrabFocus(this->EventCallbackCommand)`, `OnLeftButtonUp` releases it;
  Common/Core/vtkObject.cxx `vtkSubjectHelper::InvokeEvent` runs only the focus holders' observers while there
  are any (the "Focus loop"; the "Remainder loop" runs only `if (!focusHandled)`).
* trame-slicer (KitwareMedical/trame-slicer b027589f) src/trame_slicer/views/slice_view.py:135-146 -- slice
  logic in the application logic's slice logics, `vtkInteractorStyleUser`, then
  `vtkMRMLSliceViewInteractorStyle.SetInteractor`; :35-70 the slice image on a background `vtkActor2D`
  through a `vtkImageMapper` with window 255 and level 127.5 (the logic's output is already RGBA 0-255);
  views/abstract_view.py:129-139 the factory's application logic and registrations before
  `vtkMRMLDisplayableManagerGroup.Initialize`; core/slicer_app.py:48-52 a "default" crosshair node.

An ROI is not drawn by one drag in Slicer: vtkSlicerROIWidget.cxx adds no event translations of its own, so
it places like any markups widget, one control point on each left *release*, and a box ROI needs two placed
corners (Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx:45, :823-887) -- two clicks; a drag defines the corner
under the release.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import slicer
import vtk

from . import HeadlessScene

#: Slicer's default layout: the Red view is axial, Yellow sagittal, Green coronal.
ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

#: The slice view displayable managers we need, by class name, as the factory instantiates them.
DISPLAYABLE_MANAGERS = (
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
)


def can_render() -> bool:
    """Whether VTK can make an offscreen OpenGL context here (EGL, OSMesa or X). Events, clicks and placement
    need none; only rendering does (`render()`, and `pictures.view_rgb` for the pixels)."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    return bool(window.SupportsOpenGL())


def _ensure_crosshair(scene: vtk.vtkObject) -> None:
    """The crosshair displayable manager and the slice interactor style's cursor update look for a crosshair
    node; the application adds one ("default") to every scene, so do we."""
    if scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") is None:
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)


class SliceView:
    """One slice view: slice logic and node, offscreen window, displayable managers and Slicer's
    interactor style. Positions are world RAS (3 floats); display positions are pixels from the
    bottom-left corner."""

    def __init__(self, hs: HeadlessScene, name: str, orientation: str, size: tuple[int, int]) -> None:
        self.name = name
        self.hs = hs
        width, height = (int(s) for s in size)

        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.render_window = vtk.vtkRenderWindow()
        self.render_window.SetOffScreenRendering(1)
        self.render_window.SetMultiSamples(0)
        self.render_window.SetSize(width, height)
        self.render_window.AddRenderer(self.renderer)
        # A generic interactor: no X event loop, events come only from us.
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        # The essential line for clicks: a passive VTK style instead of VTK's default camera style
        # (vtkInteractorStyleSwitch), which grabs the interactor's focus on a button press and so hides the
        # release from Slicer's style (see the module docstring).
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())

        # The slice image: the logic's blended RGBA output on a background 2-D actor. It is the renderer's
        # first prop, so it is drawn first: 2-D actors are drawn in the order they were added, and the
        # segment fill drawn before it would be blended with the black clear colour, hiding the image.
        self.image_mapper = vtk.vtkImageMapper()
        self.image_mapper.SetColorWindow(255)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.image_actor.VisibilityOff()
        self.renderer.AddViewProp(self.image_actor)

        # Displayable managers, from the process-wide factory. Its application logic is what each new manager
        # gets, so point it at this scene's logic right before instantiating.
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(hs.app_logic)
        for manager in DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.displayable_managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.displayable_managers.Initialize(factory, self.renderer)

        # Slice logic and its slice node (ID vtkMRMLSliceNode<name>), known to the application logic.
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(hs.app_logic)
        self.logic.SetMRMLScene(hs.scene)
        hs.app_logic.GetSliceLogics().AddItem(self.logic)
        self.slice_node = self.logic.AddSliceNode(name)
        self.slice_node.SetOrientation(orientation)
        self.displayable_managers.SetMRMLDisplayableNode(self.slice_node)

        self._logic_observer = self.logic.AddObserver(vtk.vtkCommand.ModifiedEvent, self._update_image)
        self._update_image()

        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetDisplayableManagers(self.displayable_managers)
        self.style.SetSliceLogic(self.logic)
        self.style.SetInteractor(self.interactor)
        self.interactor.Initialize()
        self.interactor.UpdateSize(width, height)
        self.logic.ResizeSliceNode(width, height)

    # -- display ---------------------------------------------------------------------------------------

    def _update_image(self, *_: object) -> None:
        connection = self.logic.GetImageDataConnection()
        if connection is not None:
            self.image_mapper.SetInputConnection(connection)
        self.image_actor.SetVisibility(connection is not None)

    @property
    def composite_node(self) -> vtk.vtkObject:
        return self.logic.GetSliceCompositeNode()

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.render_window.GetSize()
        return int(width), int(height)

    def render(self) -> None:
        """Draw the view (offscreen). Events do not need it: widgets update from MRML, not from rendering."""
        self.render_window.Render()

    def show_volume(self, volume_node: vtk.vtkObject, fit: bool = True) -> None:
        """Show `volume_node` as the background layer; fit it to the view."""
        self.composite_node.SetBackgroundVolumeID(volume_node.GetID() if volume_node else None)
        if fit:
            self.fit()

    def fit(self) -> None:
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.logic.SnapSliceOffsetToIJK()

    def jump_to(self, ras: Sequence[float]) -> None:
        """Move the slice plane (without panning) so that it passes through `ras`."""
        self.slice_node.JumpSliceByOffsetting(*(float(c) for c in ras))

    # -- coordinates -----------------------------------------------------------------------------------

    def ras_to_display(self, ras: Sequence[float]) -> tuple[float, float]:
        """Display position (pixels, origin bottom-left) of a world point projected on this view."""
        ras_to_xy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self.slice_node.GetXYToRAS(), ras_to_xy)
        x, y, _, _ = ras_to_xy.MultiplyPoint((*(float(c) for c in ras), 1.0))
        return x, y

    def display_to_ras(self, x: float, y: float) -> np.ndarray:
        """World position of a display position on the slice plane (as the interactor style computes it)."""
        return np.array(self.slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])

    def pixel_spacing(self) -> tuple[float, float]:
        """World length of one display pixel along x and y."""
        xy_to_ras = self.slice_node.GetXYToRAS()
        return tuple(float(np.linalg.norm([xy_to_ras.GetElement(r, c) for r in range(3)])) for c in (0, 1))

    def slice_distance(self, ras: Sequence[float]) -> float:
        """Signed distance of a world point from the slice plane."""
        xy_to_ras = self.slice_node.GetXYToRAS()
        normal = np.array([xy_to_ras.GetElement(r, 2) for r in range(3)])
        origin = np.array([xy_to_ras.GetElement(r, 3) for r in range(3)])
        return float(np.dot(np.asarray(ras, float) - origin, normal / np.linalg.norm(normal)))

    def _pixel(self, ras: Sequence[float]) -> tuple[int, int]:
        x, y = self.ras_to_display(ras)
        width, height = self.size
        px, py = int(round(x)), int(round(y))
        if not (0 <= px < width and 0 <= py < height):
            raise ValueError(f"{tuple(ras)} is outside the {self.name} view (display {x:.1f}, {y:.1f})")
        return px, py

    # -- events ----------------------------------------------------------------------------------------

    def mouse_move(self, ras: Sequence[float]) -> None:
        self.mouse_move_pixel(*self._pixel(ras))

    def mouse_move_pixel(self, x: int, y: int) -> None:
        """Mouse move to display pixel (x, y), origin bottom-left, as a user's pointer reaches it."""
        width, height = self.size
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"pixel ({x}, {y}) is outside the {self.name} view ({width}x{height})")
        self.interactor.SetEventPosition(int(x), int(y))
        self.interactor.MouseMoveEvent()

    def click(self, ras: Sequence[float]) -> None:
        """Left click at the display position of `ras`: mouse move there, left press, left release."""
        self.click_pixel(*self._pixel(ras))

    def click_pixel(self, x: int, y: int) -> None:
        """Left click at display pixel (x, y): what a user does who aims at what the view shows there."""
        self.mouse_move_pixel(x, y)
        self.interactor.LeftButtonPressEvent()
        self.interactor.LeftButtonReleaseEvent()

    def drag(self, ras_from: Sequence[float], ras_to: Sequence[float], steps: int = 5) -> None:
        """Left press at `ras_from`, `steps` mouse moves along the line, left release at `ras_to`."""
        self.mouse_move(ras_from)
        self.interactor.LeftButtonPressEvent()
        start, end = np.asarray(ras_from, float), np.asarray(ras_to, float)
        for t in np.linspace(0.0, 1.0, max(int(steps), 1) + 1)[1:]:
            self.mouse_move(start + t * (end - start))
        self.interactor.LeftButtonReleaseEvent()

    def key(self, keysym: str, key_code: str | None = None) -> None:
        """Key press and release (at the last mouse position), e.g. "Up", "Delete", "f"."""
        if key_code is None:
            key_code = {"Delete": "\x7f", "BackSpace": "\x08", "Escape": "\x1b"}.get(keysym)
            key_code = key_code or (keysym if len(keysym) == 1 else "\0")
        self.interactor.SetKeyEventInformation(0, 0, key_code, 1, keysym)
        self.interactor.KeyPressEvent()
        self.interactor.CharEvent()
        self.interactor.KeyReleaseEvent()
        self.interactor.SetKeyEventInformation(0, 0, "\0", 0, "")

    def close(self) -> None:
        self.style.SetInteractor(None)
        self.style.SetDisplayableManagers(None)
        self.style.SetSliceLogic(None)
        self.logic.RemoveObserver(self._logic_observer)
        self.displayable_managers.SetMRMLDisplayableNode(None)
        self.hs.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.render_window.Finalize()


class SliceViews:
    """Red, Green and Yellow slice views of a headless scene (`create_headless_scene()`), offscreen.

    Methods that take a `view` accept its name ("Red") or the `SliceView`. Placing markups by clicking::

        views = SliceViews(hs)
        views.show_volume(ct)
        views.start_placing(point_list)          # active place node, interaction mode Place
        views.jump_to("Red", ras); views.click("Red", ras)
    """

    def __init__(
        self,
        hs: HeadlessScene,
        names: Iterable[str] = ("Red", "Green", "Yellow"),
        size: tuple[int, int] = (400, 400),
        orientations: dict[str, str] | None = None,
    ) -> None:
        self.hs = hs
        orientations = {**ORIENTATIONS, **(orientations or {})}
        _ensure_crosshair(hs.scene)
        self.views: dict[str, SliceView] = {}
        for name in names:
            if name not in orientations:
                raise ValueError(f"no orientation for a view named {name!r}: pass orientations={{...}}")
            self.views[name] = SliceView(hs, name, orientations[name], size)

    def __getitem__(self, name: str) -> SliceView:
        return self.views[name]

    def __iter__(self):
        return iter(self.views.values())

    def view(self, view: str | SliceView) -> SliceView:
        return view if isinstance(view, SliceView) else self.views[view]

    @property
    def interaction_node(self) -> vtk.vtkObject:
        return self.hs.app_logic.GetInteractionNode()

    @property
    def selection_node(self) -> vtk.vtkObject:
        return self.hs.app_logic.GetSelectionNode()

    def show_volume(self, volume_node: vtk.vtkObject) -> None:
        """`volume_node` as the background of every view, fitted."""
        for view in self:
            view.show_volume(volume_node)

    def render(self) -> None:
        for view in self:
            view.render()

    def start_placing(self, markups_node: vtk.vtkObject, persistent: bool = False) -> None:
        """Make `markups_node` the active place node and enter Place mode, as the Markups toolbar does."""
        if markups_node.GetDisplayNode() is None:
            markups_node.CreateDefaultDisplayNodes()
        self.selection_node.SetReferenceActivePlaceNodeClassName(markups_node.GetClassName())
        self.selection_node.SetActivePlaceNodeID(markups_node.GetID())
        self.interaction_node.SetPlaceModePersistence(1 if persistent else 0)
        self.interaction_node.SetCurrentInteractionMode(self.interaction_node.Place)

    def jump_to(self, view: str | SliceView, ras: Sequence[float]) -> None:
        self.view(view).jump_to(ras)

    def ras_to_display(self, view: str | SliceView, ras: Sequence[float]) -> tuple[float, float]:
        return self.view(view).ras_to_display(ras)

    def click(self, view: str | SliceView, ras: Sequence[float]) -> None:
        self.view(view).click(ras)

    def click_pixel(self, view: str | SliceView, x: int, y: int) -> None:
        self.view(view).click_pixel(x, y)

    def drag(
        self, view: str | SliceView, ras_from: Sequence[float], ras_to: Sequence[float], steps: int = 5
    ) -> None:
        self.view(view).drag(ras_from, ras_to, steps)

    def key(self, view: str | SliceView, keysym: str) -> None:
        self.view(view).key(keysym)

    def close(self) -> None:
        for view in self:
            view.close()
        self.views.clear()

    def __enter__(self) -> SliceViews:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
