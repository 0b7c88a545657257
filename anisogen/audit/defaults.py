"""The audit's defaults and metric names, free of torch and FAISS so that ``audit.py --help`` is instant.

:mod:`.index`, :mod:`.metrics` and :mod:`.runner` take their values from here (and re-export them).
"""

#: Default recall@k the IVF nprobe calibration must reach against exact search.
RECALL_TARGET = 0.95
#: Default number of sampled queries for measuring recall against exact search.
RECALL_SAMPLE = 1000
#: kNN index kinds and devices (``--index``, ``--device``).
KINDS = ("auto", "flat", "ivf")
DEVICES = ("auto", "cpu", "cuda")
#: Random pairs for Psi and the pairwise-cosine distributions (the paper's P is unspecified; 1e5).
N_PAIRS = 100_000
#: Label permutations estimating the expected kNN-mixing entropy.
N_PERMUTATIONS = 5

#: Scalar metric names a gate may use (per folder).
UNPAIRED_METRICS = ["delta_mu", "G_Sigma", "C_lambda", "O_q", "O_q_random", "JS_cos", "cos_mean", "cos_mean_image",
                    "M_k_Z", "M_k_X", "M_k_Z_raw", "M_k_X_raw", "M_k_expected_Z", "M_k_expected_X",
                    "nn_is_image_frac_Z", "nn_is_image_chance", "norm_mean", "norm_std", "norm_min", "norm_max",
                    "norm_max_dev", "n_image", "n_substitute", "n_image_total",
                    "n_substitute_total"]
SEMANTIC_METRICS = ["Phi", "Psi", "Omega_k"]
PAIRED_METRICS = ["paired_" + m for m in ["Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X", "A_r_T",
                                          "A_r_T_centered", "nn_is_image_frac_Z", "n"]]
METRIC_NAMES = UNPAIRED_METRICS + SEMANTIC_METRICS + PAIRED_METRICS

#: ``--verify`` modes (see docs/AUDIT.md, "Verification") and the default.
VERIFY_MODES = ("full", "sample", "none")
VERIFY = "sample"
#: In ``--verify sample``, the share of shards (seeded, at least one per folder) whose sha256 is checked.
SAMPLE_HASH_FRACTION = 1 / 16
#: Default ``--limit``: rows per input kept for the sample-based metrics (kNN, pairwise cosines, PCA,
#: semantic metrics). Moments and norm statistics always cover every row.
LIMIT = 50_000
#: Default ``--max-queries``: kNN query rows scored per set.
MAX_QUERIES = 5_000
#: Rows per task when ``.npy`` inputs are scanned in worker processes.
ROWS_PER_TASK = 131_072
#: Inputs with fewer rows are scanned in the audit's own process: starting worker processes (~2-3 s with
#: ``spawn``) would cost more than it saves.
PARALLEL_MIN_ROWS = 200_000
