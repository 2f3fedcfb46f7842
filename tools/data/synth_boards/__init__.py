"""Synthetic binarised PCB boards with labelled defects, written as a DeepPCB-format folder
(``python -m tools.data.synth_boards --help``).

Boards look like DeepPCB's: white substrate, black copper, at DeepPCB's scale (traces 6-45 px wide). The
artwork is routed at 0, 45 and 90 degrees: traces, parallel buses, rows of round (drilled) or rectangular
pads with fan-out traces, vias (rings) and copper pours, all kept a clearance apart. Defects of the six
DeepPCB classes are then drawn onto a copy; each label box is the bounding box of the pixels the defect
changed, padded like DeepPCB's boxes, and no two boxes overlap. Test and template are binarised separately
(slightly rough edges, as a scanned and thresholded board is) and misregistered by under a pixel, so away
from the defects they differ by a pixel at some edges, as DeepPCB pairs do.

Modules, in the order a board is made: ``geometry`` (shapes), ``style`` (design rules), ``layout``
(clearance-ruled placement), ``routing`` and ``footprints`` (trace paths, pads, vias), ``board`` (artwork),
``defects`` (injection and boxes), ``scan`` (binarisation), ``pair`` (one sample), ``dataset`` (the folder).
"""
