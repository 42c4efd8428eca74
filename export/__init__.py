"""edgellama.export"""
