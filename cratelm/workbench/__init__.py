"""The white-box workbench: compare CRATE variants and GPT-2 under one recipe (``compare``),
read what each sparse code unit and subspace encodes (``inspect``), and edit units
(``generate --clamp``)."""
