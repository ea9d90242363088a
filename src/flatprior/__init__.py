"""flatprior: does flatness or the function prior log P(f) predict generalization?"""
__version__ = "0.1.0"
