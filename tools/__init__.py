"""Engineering tools for the PCB defect inspection model repository (see DEVELOPING.md for the layout).

OpenCV reads its decoder pixel limit once, at its first import; tools decode whatever scan they are given
(the server enforces its own limit from the preprocess config), so the limit is lifted here, before any tool
imports cv2.
"""
import os

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**40))
