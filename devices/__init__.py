"""edgellama.devices"""
