"""Reference points for the board: the chance and oracle "attacks", and the utility baseline
(how well a model trained on encodings predicts findings, against one trained on plaintexts).

May import challenge and attacks (the reference rows are attacks like any other); never the
leaderboard: its results reach the store through the CLI.
"""
