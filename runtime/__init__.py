"""edgellama.runtime"""
