"""A thaw text model as a `transformers` sequence classifier, for Hugging Face folders.

Shipped as `modeling_thaw.py` in a text version's Hugging Face export and loaded with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`: stock
`BertForSequenceClassification` classifies the `[CLS]` token through BERT's pooler, while a
thaw model takes the mean of the last hidden states over the attention mask into its own
head (`model.build_head`: optional Linear+ReLU layers, then a Linear), so no stock class
answers as thaw does. torch and transformers only: this file must load on its own.
"""

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class ThawTextConfig(PretrainedConfig):
    model_type = "thaw_text"

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        hidden: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder or {}
        """The encoder's own `transformers` config (a BERT-family model)."""
        self.hidden = list(hidden or [])
        """The head's hidden widths, input to output."""


class ThawTextClassifier(PreTrainedModel):
    """Encoder, mean pooling over the mask, head; its logits are already divided by the
    version's calibration temperature, so their softmax is thaw's calibrated answer."""

    config_class = ThawTextConfig
    base_model_prefix = "encoder"

    def __init__(self, config: ThawTextConfig) -> None:
        super().__init__(config)
        encoder = dict(config.encoder)
        encoder_config = AutoConfig.for_model(encoder.pop("model_type"), **encoder)
        self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
        layers: list[nn.Module] = []
        width = encoder_config.hidden_size
        for size in config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        num_labels = config.num_labels  # from the config's id2label
        assert num_labels is not None
        layers.append(nn.Linear(width, num_labels))
        self.head = nn.Sequential(*layers)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return SequenceClassifierOutput(logits=self.head(pooled))
