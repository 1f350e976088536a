"""Privacy audit: attacks on what the server sees, and the scores of their reconstructions.

The adversary is the server (see ``docs/privacy.md``): it knows the architecture, every shared
parameter, each site's upload and the key generator, but not the key. Attacks here use only
that: an upload is turned into a gradient (:func:`upload_gradient`,
:func:`gradient_from_update`), then inverted analytically through the encoder's first layer
(:func:`analytic_attack`) or through the decoder alone (:func:`decoder_inversion`,
:func:`decoder_bias_attack`), or by gradient matching (:func:`dlg`: :func:`dlg_init`,
:func:`dlg_optimize`, :func:`dlg_labels`), each with the attacker's
key guess (:func:`attacker_module`: no key, a wrong key, or the correct key as the upper
bound). :func:`spectral_alignment_attack` needs no key: it undoes a secret linear feature map
from many uploads and public data; :func:`class_order_from_prevalence` finds the secret class
order from the labels of many uploads and public label counts. Reconstructions are scored by
:func:`partial_correlation`, :func:`reidentification_rate`, :func:`top_k_overlap` and
:func:`label_recovery`.

Membership inference on the released model: :func:`loss_attack` and :func:`rmia_attack` (with
reference models from :func:`train_reference_models`), scored by :func:`membership_metrics`.
:func:`wrong_key_utility` measures what the model is worth with a wrong key or none, and
:func:`audit` runs everything on a trained model into one tidy table (drawn by
:func:`scinfl.pl.privacy`): a loop over attack objects (:class:`ReconstructionAttack`,
:class:`LabelPrevalenceAttack`, :class:`MembershipAttack`, :class:`InferenceAttack`, or any
:class:`Attack`) with one :class:`AuditConfig`.
"""

from ._adaptive import class_order_from_prevalence, spectral_alignment_attack
from ._attacks import (
    DummyBatch,
    Reconstruction,
    analytic_attack,
    analytic_inversion,
    attacker_module,
    class_of_unit,
    decoder_bias_attack,
    decoder_inversion,
    dlg,
    dlg_init,
    dlg_labels,
    dlg_optimize,
    infer_label,
    input_layer,
    output_layer,
)
from ._audit import (
    Attack,
    AuditConfig,
    AuditData,
    InferenceAttack,
    LabelPrevalenceAttack,
    MembershipAttack,
    ReconstructionAttack,
    audit,
    training_rows,
)
from ._framed import framed_attackers
from ._membership import (
    MembershipResult,
    ReferenceModels,
    loss_attack,
    membership_metrics,
    rmia_attack,
    sample_losses,
    train_reference_models,
)
from ._metrics import (
    candidate_scores,
    candidate_set,
    label_recovery,
    partial_correlation,
    reidentification_rate,
    reidentify,
    top_k_overlap,
)
from ._upload import (
    client_loss,
    gradient_from_update,
    make_tensors,
    shared_parameter_names,
    upload_gradient,
)
from ._utility import wrong_key_utility

__all__ = [
    "Attack",
    "AuditConfig",
    "AuditData",
    "DummyBatch",
    "InferenceAttack",
    "LabelPrevalenceAttack",
    "MembershipAttack",
    "MembershipResult",
    "Reconstruction",
    "ReconstructionAttack",
    "ReferenceModels",
    "analytic_attack",
    "analytic_inversion",
    "attacker_module",
    "audit",
    "candidate_scores",
    "candidate_set",
    "class_of_unit",
    "class_order_from_prevalence",
    "client_loss",
    "decoder_bias_attack",
    "decoder_inversion",
    "dlg",
    "dlg_init",
    "dlg_labels",
    "dlg_optimize",
    "framed_attackers",
    "gradient_from_update",
    "infer_label",
    "input_layer",
    "label_recovery",
    "loss_attack",
    "make_tensors",
    "membership_metrics",
    "output_layer",
    "partial_correlation",
    "reidentification_rate",
    "reidentify",
    "rmia_attack",
    "sample_losses",
    "shared_parameter_names",
    "spectral_alignment_attack",
    "top_k_overlap",
    "train_reference_models",
    "training_rows",
    "upload_gradient",
    "wrong_key_utility",
]
