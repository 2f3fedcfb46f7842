"""The pcb_* inspection metrics (docs/operations.md): pcb_inspected_images_total, pcb_defects_total{class},
pcb_defects_per_image and pcb_rejected_images_total{reason}.

Two models count images answered: postprocess (each image of pcb_pipeline) and pcb_scan (each scan, with its
merged defects). Each model folder is self-contained, so this small file is in both (postprocess/1/ and
pcb_scan/1/), the same byte for byte: tests/test_operations.py checks the copies are identical. Triton merges
the families the two models declare alike into one series each.
"""
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class InspectionMetrics:
    """Images answered (``count``) and refused (``reject``, with one of ``reasons``)."""

    def __init__(self, labels_file: Path, buckets: str, reasons):
        class_names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        inspected = pb_utils.MetricFamily(name="pcb_inspected_images_total", kind=counter,
                                          description="Images answered with their defects")
        defects = pb_utils.MetricFamily(name="pcb_defects_total", kind=counter,
                                        description="Defects found, by class")
        per_image = pb_utils.MetricFamily(name="pcb_defects_per_image", kind=histogram,
                                          description="Defects found per image answered")
        rejected = pb_utils.MetricFamily(name="pcb_rejected_images_total", kind=counter,
                                         description="Images refused with an error, by reason")
        self.families = (inspected, defects, per_image, rejected)  # a metric lives while its family is held
        self.inspected = inspected.Metric(labels={})
        self.defects = [defects.Metric(labels={"class": name}) for name in class_names]
        self.per_image = per_image.Metric(labels={}, buckets=[float(edge) for edge in buckets.split(",")])
        self.rejected = {reason: rejected.Metric(labels={"reason": reason}) for reason in reasons}

    def count(self, counts, classes) -> None:
        """Images answered: ``counts`` (n,) defects of each, ``classes`` the class ids of all their defects."""
        if not len(counts):
            return
        self.inspected.increment(len(counts))
        for count in counts:
            self.per_image.observe(float(count))
        for metric, found in zip(self.defects, np.bincount(classes, minlength=len(self.defects))):
            if found:
                metric.increment(int(found))

    def reject(self, reason: str, images: int = 1) -> None:
        self.rejected[reason].increment(images)
