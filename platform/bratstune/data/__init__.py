"""data: from cohort folders to cached, preprocessed cases and training patches, in the order data flows.

* :mod:`.layout`: case discovery for every BraTS naming (2017-2025) and MSD Task01;
* :mod:`.case`: one case: :class:`~.case.Case` (files), :class:`~.case.CaseData` (arrays),
  :func:`~.case.load_case`, :func:`~.case.validate_case`; :mod:`.nifti`: volume I/O only;
* :mod:`.preprocess`: reorient + resample (:mod:`.resample`), crop to brain, z-score, percentile
  rescale, histogram matching (:mod:`.histogram`);
* :mod:`.cache`: the content-keyed ``.npy`` cache of preprocessed cases;
* :mod:`.cohort`: folder -> cached cases -> :class:`~.cohort.TrainData`; :mod:`.fingerprint`: what
  a model was trained on;
* :mod:`.sampling` and :mod:`.augment`: tumour-focused patches, stratified folds, TorchIO augments;
* :mod:`.synthetic` (+ ``synth_anatomy``, ``synth_tumour``, ``synth_contrast``): synthetic cohorts.

Importing this package imports nothing; import the module you need.
"""

__all__ = [
    "augment",
    "cache",
    "case",
    "cohort",
    "fingerprint",
    "histogram",
    "layout",
    "nifti",
    "preprocess",
    "resample",
    "sampling",
    "synthetic",
]
