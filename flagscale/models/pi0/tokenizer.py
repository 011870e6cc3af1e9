"""A small byte-level BPE tokenizer with Gemma's special ids, for tests and the CPU demo.

Real serving loads the PaliGemma tokenizer from a local directory (`google/paligemma-3b-pt-224`).
This one is built locally in well under a second, so nothing is ever downloaded.
Special ids as in Gemma: <pad> 0, <eos> 1, <bos> 2; BOS is prepended to every encoding.
"""

import json
import os

CORPUS = [
    "grab the orange and put it into the basket",
    "pick up the red cube and place it in the bowl",
    "open the drawer, close the door, fold the towel",
    "move the left arm to the right; stack blocks on the table",
    "Transfer the cube to the other arm. Insert the peg into the socket.\n",
]


def build_test_tokenizer(out_dir: str, vocab_size: int = 512) -> str:
    """Write tokenizer.json + tokenizer_config.json to `out_dir` (AutoTokenizer-loadable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "right",
        "model_max_length": 1024,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
