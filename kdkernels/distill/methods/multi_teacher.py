"""(methods of this category are being added)"""
