"""Special token ids shared by every task and tokenizer (ids 0..3 are reserved)."""

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIAL = 4
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
