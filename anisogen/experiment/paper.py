"""Numbers reported by the papers, shown beside ours for orientation only.

They come from other models (7B-scale LLaVA-style MLLMs, real images) and other benchmarks, so the
comparison is **qualitative**: only the ordering of methods is comparable, never the values. Sources:
"Anisotropic Modality Align" (Yu et al., arXiv 2605.07825), Tables 1, 3, 4; APP, "The Dominance of Text
Space: Unveiling the Asymmetric Nature of Cross-Modal Alignment in Large Language Models" (Chen et al.),
Table 3; Gap-Init, "When Is Rank-1 Enough? Geometry-Guided Initialization for Parameter-Efficient
Fine-Tuning" (Zhao, Han, Hovy, arXiv 2602.01522), Table 7; MoReS, "LLaVA Steering: Visual Instruction
Tuning with 500x Fewer Parameters through Modality Linear Representation-Steering" (Bi et al., ACL 2025,
arXiv 2412.12359), Table 1.
"""

from __future__ import annotations

#: AnisoAlign Table 1 (fully text-only training): benchmark average and POPE; Table 3 "W/. Image" as
#: the paired-image reference, Table 1 "Blind".
ANISOALIGN_TABLE1 = {
    "identity": {"avg": 40.08, "pope": 55.28, "label": "W/o. Align"},
    "unicorn": {"avg": 42.57, "pope": 55.31, "label": "Unicorn"},
    "c3": {"avg": 42.44, "pope": 54.17, "label": "C3 Align"},
    "realign": {"avg": 45.00, "pope": 56.91, "label": "ReAlign"},
    "anisoalign": {"avg": 47.49, "pope": 57.62, "label": "AnisoAlign"},
    "oracle": {"avg": 52.72, "pope": 74.16, "label": "W/. Image (Table 3, with SFT)"},
    "blind": {"avg": 7.85, "pope": 0.60, "label": "Blind"},
}

#: AnisoAlign Table 4 (ablation, fully text-only): benchmark average. The mapping of our registered
#: ablations onto its rows follows the aligner docstrings.
ANISOALIGN_TABLE4 = {
    "anisoalign-init": {"avg": 43.59, "label": "Global Init only"},
    "anisoalign-refine": {"avg": 44.93, "label": "+ Refinement"},
    "anisoalign-prior": {"avg": 46.56, "label": "+ Refinement + L_II"},
    "anisoalign-phase": {"avg": 46.45, "label": "+ Refinement + L_Phi"},
    "anisoalign": {"avg": 47.49, "label": "AnisoAlign (full)"},
}

#: APP Table 3 (LLaVA-1.5 projector, 8 recognition tasks): average accuracy.
APP_TABLE3 = {"zero-shot": 54.9, "full fine-tuning": 77.8, "naive task vector": 69.5, "APP": 75.2}

#: Gap-Init Table 7 (rank 1, 5 seeds, captioning CIDEr): mean and std.
GAPINIT_TABLE7 = {"lora-r1 (random init)": (135.37, 7.10), "gap_init r1": (140.57, 1.44)}

#: MoReS Table 1 (LLaVA Steering-3B): trainable parameters and ScienceQA-IMG accuracy.
MORES_TABLE1 = {"MoReS r1": ("0.164M", 89.7), "LoRA r8": ("188.7M", 93.9)}
