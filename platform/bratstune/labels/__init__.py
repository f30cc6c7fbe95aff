"""Label schemes of the BraTS challenges, their evaluated regions, and the region → label decode.

A segmentation is an integer volume ``(X, Y, Z)``; what each value means depends on the
challenge and the year (the *label scheme*). Models are trained on overlapping binary
*regions* (WT ⊇ TC ⊇ ET for adult glioma) and their per-region probabilities are decoded
back to disjoint labels by a hierarchy of thresholded steps.

Schemes (0 is always background):

============== ======================================= ==================================================
name           labels                                  regions
============== ======================================= ==================================================
brats2023      1 NCR, 2 ED (SNFH), 3 ET                 WT {1,2,3}, TC {1,3}, ET {3}
brats2024_gli  1 NETC, 2 SNFH, 3 ET, 4 RC               WT {1,2,3}, TC {1,3}, ET {3}, RC {4},
                                                       NETC {1}, SNFH {2}  (RC is in neither WT nor TC)
brats2024_ped  1 ET, 2 NET, 3 CC, 4 ED                  WT {1,2,3,4}, TC {1,2,3}, ET {1}, NET {2},
                                                       CC {3}, ED {4}
legacy         1 NCR/NET, 2 ED, 4 ET (BraTS 2017–2021)  WT {1,2,4}, TC {1,4}, ET {4}
msd_task01     1 ED, 2 NET, 3 ET (MSD Task01)           WT {1,2,3}, TC {2,3}, ET {3}
brats2024_men_rt 1 GTV (meningioma radiotherapy)        GTV {1}
============== ======================================= ==================================================

Decode: ``LabelScheme.decode`` is a sequence of steps ``(region, label)``, outermost first.
Step *k* selects the voxels where ``p_region >= threshold_region`` **and** that lie inside the
mask selected by its *parent* step, and paints them with ``label``; later steps overwrite
earlier ones. The parent is the previous step unless ``LabelScheme.decode_inside`` names
another region (or ``None`` = the whole volume). This handles hierarchies that are not a
single chain, e.g. paediatric tumours where the cystic component and the enhancing tumour
both lie inside the tumour core but not inside each other.
"""

from bratstune.labels.convert import conversion_table, convert_labels
from bratstune.labels.regions import check_labels, label_values, labels_to_regions, regions_to_labels
from bratstune.labels.schemes import (
    CHALLENGES,
    SCHEMES,
    Challenge,
    DecodeStep,
    LabelScheme,
    SchemeName,
    get_scheme,
    scheme_for,
)

__all__ = [
    "CHALLENGES",
    "SCHEMES",
    "Challenge",
    "DecodeStep",
    "LabelScheme",
    "SchemeName",
    "check_labels",
    "conversion_table",
    "convert_labels",
    "get_scheme",
    "label_values",
    "labels_to_regions",
    "regions_to_labels",
    "scheme_for",
]
