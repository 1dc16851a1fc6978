"""Run inside Slicer (`Slicer --python-script .github/scripts/slicer_prepare.py STEP`) by
.github/workflows/slicer.yml, to get a fresh Slicer ready for SAMMed2DSegmentTest without a dialog:

  extension     install the PyTorch extension from the Extensions server (Slicer must restart to load it);
  requirements  through this module's own logic, what a user confirms in the panel: PyTorch with the
                PyTorch extension's light-the-torch commands (polled child processes), then the engine's
                packages into the extension's private folder.

As dalcalab/SlicerMultiverSeg does (.github/actions/slicer-install-extensions/install_extensions.py and
.github/python_scripts/install_pytorch_module.py at c205fd9b): the extensions manager set non-interactive,
then `installExtensionFromServer`, then quit. Exits non-zero, with one line, when a step fails.
"""

import sys
import time

import slicer


def install_extension() -> None:
    manager = slicer.app.extensionsManagerModel()
    manager.setInteractive(False)
    if manager.isExtensionInstalled("PyTorch"):
        return
    if not manager.installExtensionFromServer("PyTorch", False):
        raise RuntimeError("the PyTorch extension could not be installed from the Extensions server")


def run_to_end(installer) -> None:
    """Poll an installer the module's way until it ends; its error, one line, is raised."""
    progress, shown = installer.poll(), ""
    while not progress.finished:
        if progress.line and progress.line != shown:
            shown = progress.line
            print(shown, flush=True)
        time.sleep(1.0)
        progress = installer.poll()
    if progress.error:
        raise RuntimeError(progress.error)


def install_requirements() -> None:
    from SAMMed2DSegment import SAMMed2DSegmentLogic

    logic = SAMMed2DSegmentLogic()
    state = logic.requirements()
    if state.torch_problem:
        run_to_end(logic.startTorchInstall())
        state = logic.requirements()
    if state.missing:
        run_to_end(logic.startPackageInstall(state.missing))
        state = logic.requirements()
    if not state.ready:
        raise RuntimeError(state.message)
    print(state.message)


if __name__ == "__main__":
    steps = {"extension": install_extension, "requirements": install_requirements}
    try:
        steps[sys.argv[1]]()
    except Exception as error:  # one line in the job's log, and a failed step
        print(f"error: {error}", file=sys.stderr)
        slicer.util.exit(1)
    else:
        slicer.util.exit(0)
