"""Small random Llama models, tokenizers and PEFT adapters, made locally.

Tests, the demo and the benchmarks need a real model without downloading one.
These are real HF checkpoints that vLLM serves and PEFT adapts, so vLLM's
greedy output can be checked token for token against HF + PEFT
(:func:`reference_greedy`). Needs ``transformers``, ``peft`` and ``tokenizers``
(the ``trl`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "hot swapping adapters keeps every engine in step with the trainer",
    "the store is the one source of truth that engines follow",
    "rewards go up when the policy learns to say yes",
    "yes yes yes the model said yes to every question",
    "numbers like one two three four five six seven eight nine ten",
    "hello world hello engine hello adapter hello version",
)
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class ToyModelSpec:
    """Shape of a random Llama. CPU attention in vLLM needs head_dim in {32, 64, 80, ...}."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 384
    max_position_embeddings: int = 512
    # Larger than HF's default 0.02 so logits have clear winners and greedy
    # decoding is not decided by rounding noise between implementations.
    initializer_range: float = 0.15


TEST_MODEL = ToyModelSpec()
BENCH_MODEL = ToyModelSpec(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816, vocab_size=2048)


def make_tokenizer(path: Path, vocab_size: int = 384, corpus: Sequence[str] = CORPUS):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.save_pretrained(path)
    return hf


def make_model(path: Path, spec: ToyModelSpec = TEST_MODEL, seed: int = 0) -> Path:
    """Write a random float32 Llama with its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


def pretrain(model_dir: Path, steps: int = 25, learning_rate: float = 3e-3, corpus: Sequence[str] = CORPUS) -> Path:
    """A few steps of next-token training on ``corpus``, in place: the model then writes
    corpus-like text (so an RL reward on its words has something to start from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = tokenizer(list(corpus), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def make_adapter(
    base_model: Path,
    out: Path,
    seed: int,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    alpha: float | None = None,
) -> Path:
    """Save a random PEFT LoRA for ``base_model`` that visibly changes its outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(target_modules),
        init_lora_weights=False,  # random A and B: the adapter changes outputs
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    return out


class ReferenceModel:
    """HF transformers (+ PEFT) at float32: the oracle every test compares vLLM's output with.

    vLLM's greedy decoding with ``ignore_eos`` equals :meth:`greedy` token for token.
    """

    def __init__(self, base_model: Path, adapter: Path | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()

    def greedy(self, prompt: str, max_tokens: int) -> list[int]:
        """Greedy continuation token ids, EOS ignored."""
        import torch

        ids = torch.tensor([self.tokenizer(prompt).input_ids])
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                next_id = int(self.model(ids).logits[0, -1].argmax())
                generated.append(next_id)
                ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
        return generated


def reference_greedy(
    base_model: Path, adapter: Path | None, prompts: Sequence[str], max_tokens: int
) -> list[list[int]]:
    reference = ReferenceModel(base_model, adapter)
    return [reference.greedy(prompt, max_tokens) for prompt in prompts]
