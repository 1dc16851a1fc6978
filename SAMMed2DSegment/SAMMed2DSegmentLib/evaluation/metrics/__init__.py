"""The CVPR 2025 interactive challenge's scores (`SurfaceDice.py`, `CVPR25_iter_eval.py` of
JunMa11/CVPR-MedSegFMCompetition): normalized surface Dice (`surface.py`, with its surfel table in
`surfels.py`) and the per-step scores and their area under the curve (`interactive.py`)."""
