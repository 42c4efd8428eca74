"""edgellama.quantize"""
