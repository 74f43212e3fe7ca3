# Frames and __sk_buff contexts for per-packet.sh: args OUTMAC UPLINKMAC CLIENTPORT BRIDGEMAC UPLINKIFINDEX PORTIFINDEX DIR
import struct, sys
def csum(b):
    if len(b)%2: b+=b'\0'
    s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16
    return (~s)&0xffff
def mac(m): return bytes(int(x,16) for x in m.split(':'))
def ip(a): return bytes(int(x) for x in a.split('.'))
def tcp_frame(smac,dmac,sip,dip,sport,dport,flags=0x10,payload=b'x'*64):
    tcp=struct.pack('!HHIIBBHHH',sport,dport,1000,2000,5<<4,flags,64240,0,0)
    ph=ip(sip)+ip(dip)+struct.pack('!BBH',0,6,len(tcp)+len(payload))
    c=csum(ph+tcp+payload); tcp=tcp[:16]+struct.pack('!H',c)+tcp[18:]
    iph=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(tcp)+len(payload),1,0,64,6,0,ip(sip),ip(dip))
    iph=iph[:10]+struct.pack('!H',csum(iph))+iph[12:]
    return mac(dmac)+mac(smac)+b'\x08\x00'+iph+tcp+payload
out_mac, up_mac, client_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = sys.argv[7]
# inbound data of the established connection: outside -> host:8080
open(out+'/inbound.bin','wb').write(tcp_frame(out_mac,up_mac,'10.78.0.2','10.78.0.1',client_port,8080))
# east-west: a -> b
open(out+'/eastwest.bin','wb').write(tcp_frame('02:77:00:00:00:02','02:77:00:00:00:03','10.77.0.2','10.77.0.3',40000,5201))
# a -> the outside through the gateway, no connection of xbr's: the reply lookup misses
open(out+'/egress.bin','wb').write(tcp_frame('02:77:00:00:00:02',sys.argv[4],'10.77.0.2','10.78.0.2',40001,443))
# __sk_buff contexts: ifindex (offset 40) set to the port or uplink the frame arrives on
def ctx(ifindex, path):
    b=bytearray(192); struct.pack_into('<I',b,40,ifindex); open(path,'wb').write(bytes(b))
ctx(int(sys.argv[5]),out+'/ctx_uplink.bin'); ctx(int(sys.argv[6]),out+'/ctx_port.bin')
