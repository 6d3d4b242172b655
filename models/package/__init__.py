"""The torch-free model contract: what training builds and the edge and central run and check.

Imported by edge, central and training (``models``); imports nothing of the project but ``stream``.
Never torch or onnx (those are the ``models`` extra's).

- :mod:`models.package.manifest`: the package format: the manifest schema, reading and writing
  ``manifest.json``, tar limits
- :mod:`models.package.signing`: Ed25519 keys and signatures over manifests; which keys a site trusts
- :mod:`models.package.files`: a package on disk (folder or tar): load with checksum and signature checks,
  write, sign, extract
- :mod:`models.package.preprocess`: camera frames to a segmentation model's input (resize or native size,
  padding, buckets)
- :mod:`models.package.session`: ONNX Runtime sessions: execution providers, the graph check, the segmentation
  model
- :mod:`models.package.postprocess`: probability maps to defect regions and the image-level alarm
- :mod:`models.package.anomaly`: the streaming LSTM anomaly model and its calibration
- :mod:`models.package.evaluation`: quality measures of anomaly alarms and defect masks, shared by training,
  the offline evaluations and the benches
- :mod:`models.package.series`: the generic CSV time-series reader
- :mod:`models.package.synthetic`: a synthetic conveyor camera and water pump
"""

from models.package.manifest import (
    MANIFEST_FILE, MAX_CHANNELS, MODEL_FILE, NAME_PATTERN, AnomalyPostprocess, AnomalyPreprocess, Manifest,
    PackageError, PackageSettings, Postprocess, Preprocess, SegmentationPostprocess, SegmentationPreprocess,
    Signature, TensorSpec, manifest_json, read_manifest, write_manifest,
)
from models.package.signing import (
    BUILTIN_PACKAGES, DEFAULT_SIGNING_KEY, SIGNING_KEY_ENV, TRUSTED_KEYS_FILE, SignatureConfig, SigningError,
    builtin_trusted_keys, canonical_manifest_bytes, default_signing_key_path, ensure_signing_key,
    generate_keypair, key_id, load_private_key, load_public_key, load_public_keys, public_key_pem,
    sign_manifest, trusted_keys, verify_signature, write_public_key,
)
from models.package.files import (
    CACHE_ENV, TAR_SUFFIXES, Package, default_cache_dir, extract_package_tar, extraction_dir, is_package_tar,
    load_package, remove_extraction, sha256_file, sign_builtin_packages, sign_package, write_package,
    write_package_tar,
)
from models.package.preprocess import (
    input_size, native_buckets, pad_input, padded_size, preprocess_frame, reference_input,
)
from models.package.session import (
    ONNX_ELEMENT_TYPES, PROVIDERS, ModelLoadError, PackagedModel, SegmentationModel, check_model_graph,
    create_session, resolve_providers, tensorrt_options, trt_cache_dir,
)
from models.package.postprocess import (
    image_alarm, mask_from_probabilities, region_mask, regions_from_probabilities, top_k_score,
)
from models.package.anomaly import (
    SECONDS_PER_DAY, TAIL_QUANTILE, THRESHOLD_FLOOR, TOP_CHANNELS, AlarmEvent, AnomalyScore, Calibration,
    StreamingAnomalyModel, apply_profile, budget_threshold, calibrated_threshold, channel_errors, ema_rows,
    fit_normalisation, fit_residual_scale, runs, smooth, smooth_scores,
)
from models.package.evaluation import (
    event_metrics, score_streams, segmentation_metrics,
)
from models.package.series import (
    GAP_FACTOR, LABEL_COLUMNS, SEPARATORS, TIME_COLUMNS, Series, column_key, count_gaps, gap_flags,
    parse_number, parse_time, read_series_csv, sniff_separator,
)
from models.package.synthetic import (
    ANOMALY_KINDS, CHANNELS, DEFECT_TYPES, PumpEpisode, SyntheticCamera, SyntheticFrame, SyntheticPump,
    make_dataset, pump_dataset,
)

__all__ = [
    "AlarmEvent", "ANOMALY_KINDS", "AnomalyPostprocess", "AnomalyPreprocess", "AnomalyScore", "apply_profile",
    "budget_threshold", "BUILTIN_PACKAGES", "builtin_trusted_keys", "CACHE_ENV", "calibrated_threshold",
    "Calibration", "canonical_manifest_bytes", "channel_errors", "CHANNELS", "check_model_graph", "column_key",
    "count_gaps", "create_session", "default_cache_dir", "DEFAULT_SIGNING_KEY", "default_signing_key_path",
    "DEFECT_TYPES", "ema_rows", "ensure_signing_key", "event_metrics", "extract_package_tar", "extraction_dir",
    "fit_normalisation", "fit_residual_scale", "GAP_FACTOR", "gap_flags", "generate_keypair", "image_alarm",
    "input_size", "is_package_tar", "key_id", "LABEL_COLUMNS", "load_package", "load_private_key",
    "load_public_key", "load_public_keys", "make_dataset", "Manifest", "MANIFEST_FILE", "manifest_json",
    "mask_from_probabilities", "MAX_CHANNELS", "MODEL_FILE", "ModelLoadError", "NAME_PATTERN", "native_buckets",
    "ONNX_ELEMENT_TYPES", "Package", "PackagedModel", "PackageError", "PackageSettings", "pad_input", "padded_size",
    "parse_number", "parse_time", "Postprocess", "Preprocess", "preprocess_frame", "PROVIDERS", "public_key_pem",
    "pump_dataset", "PumpEpisode", "read_manifest", "read_series_csv", "reference_input", "region_mask",
    "regions_from_probabilities", "remove_extraction", "resolve_providers", "runs", "score_streams",
    "SECONDS_PER_DAY", "segmentation_metrics", "SegmentationModel", "SegmentationPostprocess",
    "SegmentationPreprocess", "SEPARATORS", "Series", "sha256_file", "sign_builtin_packages", "sign_manifest",
    "sign_package", "Signature", "SignatureConfig", "SIGNING_KEY_ENV", "SigningError", "smooth", "smooth_scores",
    "sniff_separator", "StreamingAnomalyModel", "SyntheticCamera", "SyntheticFrame", "SyntheticPump",
    "TAIL_QUANTILE", "TAR_SUFFIXES", "tensorrt_options", "TensorSpec", "THRESHOLD_FLOOR", "TIME_COLUMNS",
    "TOP_CHANNELS", "top_k_score", "trt_cache_dir", "trusted_keys", "TRUSTED_KEYS_FILE", "verify_signature",
    "write_manifest", "write_package", "write_package_tar", "write_public_key",
]
